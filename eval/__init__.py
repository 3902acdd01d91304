"""sslpipe evaluation: frozen features, kNN, linear probe, export and reports (never imports pretext)."""
