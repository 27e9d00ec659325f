"""The training photos: found, checked and loaded (photos), batched with their prompts (batches),
and the prompt checks that need the tokenizer (prompts).
"""
