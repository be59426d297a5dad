"""Export helpers: exact block-alignment padding (`padding`) and llama.cpp split GGUF files (`split`)."""
