"""Switchyard: a Kubernetes-native control plane for distributed LLM serving."""

__all__ = ["__version__"]

__version__ = "0.1.0"
