"""Model backends, one file each. Only `kandinsky` (mindone, MindSpore) exists today."""
