"""Data the pipeline reads: the deterministic demo world and the question-answer prompt format."""
