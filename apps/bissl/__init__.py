"""BiSSL reference application: SimCLR pretext training, fine-tuning and evaluation pipelines."""
