"""Calibration data and statistics: the calibration windows (`windows`), the one block-by-block calibration loop
(`blocks`: activations and Hessians), llama.cpp-compatible importance matrices (`imatrix`, `imatrix_run`)."""
