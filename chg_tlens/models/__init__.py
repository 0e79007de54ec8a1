"""Getting a model (``load_model``) and the one adapter that knows TransformerLens 4 from 3.9."""
