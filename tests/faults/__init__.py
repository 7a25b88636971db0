"""The fault matrix: every fault at every migration phase boundary, on namespaced hosts."""
