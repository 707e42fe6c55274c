"""Data the pipeline reads: the deterministic demo world, the question-answer prompt
format, the training corpus with its token cache, and the windows drawn from them."""
