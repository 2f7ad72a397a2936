"""Model card templates, installed as `hf_rifle.model_cards` (read with importlib.resources)."""
