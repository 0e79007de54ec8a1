"""Models whose head roles are known (planted circuits, trained toys): the answers tests check against."""
