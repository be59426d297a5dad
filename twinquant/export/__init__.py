"""Export helpers: exact block-alignment padding (`padding`); split files live in `twinquant.io.split`."""
