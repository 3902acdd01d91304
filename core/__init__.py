"""What every sslpipe package shares and no package owns: errors, the option types a pretext task
and a backbone read, grid figures, the kNN vote. It imports no other sslpipe package."""
