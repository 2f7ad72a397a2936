"""RIFLE for the Hugging Face training stack."""
