"""Training data: the dataset and its loader (dataset), image folders and their listing
(sources), Hugging Face data sets (hf_source), and converters from published formats (convert)."""
