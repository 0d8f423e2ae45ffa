"""Model surgery the other stages share: fused mixture-of-experts weights as one ``nn.Linear`` per expert."""
