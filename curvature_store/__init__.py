"""The persistent artifact layer (curvature, stream state, versioned deltas). Not built yet:
see the store issue. Its tensor I/O will reuse `crispedit.artifacts`."""
