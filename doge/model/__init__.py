"""The Doge model: config and presets, modeling (DMA attention, CDMoE, RoPE, fused loss),
KV-cache decoding and dense-to-CDMoE upcycling. Imports only torch and `transformers`."""
