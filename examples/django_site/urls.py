from django.urls import path

from . import views

urlpatterns = [
    path("posts/<str:post>/comments", views.create_comment, name="create-comment"),
]
