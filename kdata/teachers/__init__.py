"""Teachers: litellm models behind one `TeacherPool`, with a durable request cache."""
