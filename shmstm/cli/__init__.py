"""The command-line tools: shmstm-stats, shmstm-cleanup and shmstm-demo."""
