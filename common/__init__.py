"""What every app of the portal shares and that belongs to none of them: the domain errors
and the small validators. Standard library only."""
