"""speft_core: salience-aware sparse fine-tuning (SPEFT) as a plain library."""
