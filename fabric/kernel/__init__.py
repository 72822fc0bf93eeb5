"""Kernel-facing adapters: namespaces, links, sysctls and the route table."""
