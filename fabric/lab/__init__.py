"""`fabricctl lab`: a multi-host fabric inside network namespaces on one machine."""
