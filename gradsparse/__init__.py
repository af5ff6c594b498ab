"""gradsparse: activation sparsity, gradient sparsity and flat minima, measured in JAX."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """Lazy top-level exports (importing gradsparse stays cheap): ``gradsparse.sparsify``."""
    if name == "sparsify":
        from gradsparse.plugins.sparsify import sparsify

        return sparsify
    raise AttributeError(f"module 'gradsparse' has no attribute {name!r}")
