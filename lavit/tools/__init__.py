"""The user-facing commands over the layers below: ``lavit bench | analyze | sweep | report | export``."""
