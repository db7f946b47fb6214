"""tokenmill models: nn.Modules only (tokenizer, quantizer, discriminators, LPIPS, transformers, GANs)."""
