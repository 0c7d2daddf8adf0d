"""Built-in recipes (YAML), shipped as package data so installed images serve them too."""
