"""ComfyUI glue: node schemas, attn2 patching and the server route. Imports ComfyUI; processors/ does not."""
