"""Model families (a registry keyed by the HF model_type), the paged LM, weights and preprocessing."""
