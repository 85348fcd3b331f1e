//! campaign-gate: a reverse-proxy auth sidecar for Campaign-style APIs.
