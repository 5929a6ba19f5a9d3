# The default email templates, installed as the package epnalert.templates.
