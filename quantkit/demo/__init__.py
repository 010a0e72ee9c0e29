"""The quantkit demo: a generated corpus, a tiny trained LM, RTN vs GPTQ at 4 and 3 bits."""
