"""Graph passes of the compiler: linear-form propagation, lowering, cleanup."""
