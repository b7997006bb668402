"""Layer 4: methods × seeds comparisons, their summary statistics, every plot, report.html and the classic
diagnosis commands."""
