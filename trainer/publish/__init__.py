"""The run on the Hugging Face Hub: the model card (card) and the upload and download (hub).
"""
