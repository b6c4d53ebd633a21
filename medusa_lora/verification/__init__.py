"""Checking a drafted tree in one forward: tree attention (``attention``), which nodes the model accepts
(``verify``), and keeping the accepted path in the KV cache (``kv_cache``)."""
