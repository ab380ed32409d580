"""Model assembly and the family registry behind the Auto classes."""
