"""The method: segmentation network, crops, classifier, skin tone and quality checks."""
