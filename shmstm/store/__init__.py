"""The LMDB store of durable runtimes: environments (env), the data's layout
(schema), the runtime's side (durable) and the flusher process (flusher)."""
