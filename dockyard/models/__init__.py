"""Model classes, one file per architecture family, built only from canonical ops."""
