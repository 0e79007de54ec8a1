"""The method: gates on hook_z, the objective, data, the batched gated forward, the fit and its result."""
