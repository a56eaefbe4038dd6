"""Model export and import (Hugging Face Huginn format)."""
