"""Compression methods (arms); each module holds the pure algorithm first; the registry is to come."""
