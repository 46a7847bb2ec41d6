"""The authors' released artifacts (JAX/flax, HF ``Goodeat/drifting``) read without JAX and mapped to our modules."""
