"""Everything around the tuner that reads or writes files.

Saving, the Hub, migration, export, plots and transformers' adapter loader. Imports only `peft_xlora.core`.
"""
