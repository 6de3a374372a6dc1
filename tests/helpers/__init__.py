"""Test helpers: tiny models and experts, the reference implementations, the Hub server, a tokenizer."""
