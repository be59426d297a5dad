"""Which type each tensor gets: llama-quantize's mixes and `--tensor-type` rules (`mixes`), the measured cost of
every candidate (`measure`), the budgeted choice (`solve`) and size / bpw targets (`target`)."""
