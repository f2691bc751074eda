"""What a finished run's numbers say, for people: the run summary `rayattr show` prints (summary),
how sources stand against each other (standing), and report.html with its PNG figures (html,
trust, figures). Nothing is imported here: the figures need matplotlib, and `rayattr values`
and `show` read only the summary and the standing."""
