"""What users look at: the HTML report and the terminal summary."""
