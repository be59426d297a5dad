"""Quantization algorithms into any codec: RTN (`rtn`), GPTQ (`gptq`), activation fake-quant (`actquant`), the
`Quantizer` backends (`backends`, `hqq_backend`). They see matrices and Hessians, never a model."""
