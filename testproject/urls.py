from __future__ import annotations

from django.contrib import admin
from django.urls import path

from testproject import views

urlpatterns = [
    path("", views.chat, name="chat"),
    path("dashboard/", views.dashboard, name="dashboard"),
    path("healthz/", views.health, name="health"),
    path("admin/", admin.site.urls),
]
