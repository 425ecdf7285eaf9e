"""`pdmesh advise`: sweep the request rate against a running mesh, find the knee, name the phase that saturates first."""
